"""Images from audio: diffusers pipelines (`pipelines`), the server's render rounds (`rounds`), grids and galleries
(`gallery`) and the CLIP judge (`judge`). Import the module you need: diffusers takes seconds to import."""
