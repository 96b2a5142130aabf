"""Model components of profusion-rt (tokenizer, text encoder, UNet, VAE, encoder wrappers)."""
