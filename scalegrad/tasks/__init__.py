"""fairseq components; imported (and so registered) by the package __init__."""
