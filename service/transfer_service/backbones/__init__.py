"""Pretrained backbones: catalog, trunk adapters, input preprocessing and the device cache."""
