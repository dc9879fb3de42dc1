"""The main job, placeholder until the model loader lands (replaced below)."""
