"""Graph specs and the artifact layout shared by ``export/`` (which writes artifacts) and the runtime
(which reads them). Nothing here imports onnx, onnxruntime, polygraphy or TensorRT.

* :mod:`.specs`: one :class:`~.specs.GraphSpec` per exported graph (``GRAPHS``).
* :mod:`.graphs`: the torch modules behind the graphs (also usable by a torch backend).
* :mod:`.store`: the cache layout, manifests, hashes, atomic writes and ``runtime.json``.
"""
