"""Image networks used as measuring instruments (not trained): VGG16 features for a perceptual loss."""
