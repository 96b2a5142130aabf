"""The ``toy-faces`` preset: its data (scikit-image's LFW faces), its training script and its evaluation
(docs/toy-faces.md)."""
