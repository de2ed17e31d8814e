"""The loader's path, in the order a batch takes it: the source (folder.py: a class-folder tree;
shards.py: a packed one) -> sampler.py (this rank's indices per epoch) -> pipeline.py (DALI's
decode, crop, resize, flip) -> host.py (CPU placement: resize and finish in a thread pool) ->
loader.py (the iterator the trainer reads; schedule.py gives its side per epoch).
"""
