"""Placeholder, replaced below."""
def finalize(*a, **k):
    raise NotImplementedError
