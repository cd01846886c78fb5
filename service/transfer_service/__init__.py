"""transfer-service server: resident pretrained backbones, per-request task heads."""
