"""Emu (baaivision/Emu): Emu1 and Emu2-Gen in plain PyTorch. See README.md."""
