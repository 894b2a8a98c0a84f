"""Training data and training loops for the from-scratch CLIP and OWL-ViT-style models.

``synthetic`` renders seeded scenes of coloured shapes (with a compositional train/test split
and a moving-camera sequence for demos); ``coco`` writes them as, and reads back any, COCO
detection dataset.
"""
