"""FLUX.1 Kontext [dev] image editing on diffusers/transformers components."""
