"""Kernels dynaflow offers as registered ops, the way users register their own: a ``torch.library`` op with a
fake implementation, a batch rule and a resource tag (see :mod:`.decode_attention`)."""
