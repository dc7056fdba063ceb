"""The CAVGA networks, their Grad-CAM attention and the losses: pure ``nn.Module``s and tensor functions."""

from cavga.model.networks import CavgaNet, CavgaOutput, build_model, load_encoder_weights

__all__ = ["CavgaNet", "CavgaOutput", "build_model", "load_encoder_weights"]
