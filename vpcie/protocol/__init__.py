"""Wire formats: tunnel frames (frames.py), the vGPU batch (batch.py), their
numbers and caps (codes.py), and codecs derived from the construct
definitions (fastcodec.py)."""
