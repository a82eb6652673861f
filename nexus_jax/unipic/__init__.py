"""UniPic-1 on the shared framework: LLM bridge, masked-AR sampling loop, understanding, losses."""
