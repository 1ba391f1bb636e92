"""Models by name: the zoo, architectures (zoo, timm, the user's MODULE:FACTORY), checkpoints, models
trained here, torch.export programs."""
