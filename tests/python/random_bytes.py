"""Writes bytes from every source of randomness and time a Python task can reach."""

import os
import random
import time
import uuid

import grid

rng = grid.rng()
with open("/out/random.txt", "w") as f:
    f.write(f"numpy {rng.random(4).tolist()}\n")
    f.write(f"random {random.random()}\n")
    f.write(f"urandom {os.urandom(8).hex()}\n")
    f.write(f"uuid {uuid.uuid4()}\n")
    f.write(f"hash {hash('grid')}\n")
    f.write(f"time {time.time()}\n")
    f.write(f"set {list({'a', 'b', 'c', 'd', 'e'})}\n")
