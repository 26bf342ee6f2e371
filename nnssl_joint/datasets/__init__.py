"""Writers of raw nnU-Net datasets: generated data (:mod:`.synthetic`) and the real images shipped
inside PyPI/Debian packages (:mod:`.real`)."""
