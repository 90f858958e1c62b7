"""tandem.kernels: Triton kernels for the GPU workers, each beside its plain-torch reference.
Built by the kernels issue (#5)."""
