"""The MaskSAM network: SAM backbones with depth adapters, the prompt generator and heads."""
