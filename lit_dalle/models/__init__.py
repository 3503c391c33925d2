"""Plain `nn.Module` networks (no training logic): the dVAE's encoder and decoder, ..."""
