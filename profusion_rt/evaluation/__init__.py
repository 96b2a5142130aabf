"""``profusion-rt eval``: quality (the paper's CLIP-T, CLIP-I, DINO and face-identity similarities) and
fidelity of every backend against the eager reference (PSNR, SSIM, CLIP-I, latent error). See docs/eval.md."""
