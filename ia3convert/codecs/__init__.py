"""Storage formats, one module each: the only code that knows bit layouts.

Every function here is pure (tensors in, tensors out, no files) so it can be tested bit for bit against
bitsandbytes' own functions.
"""
