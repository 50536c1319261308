"""Static sparse training: the initial random mask never changes."""

from cigl.sparse.method import Method

METHOD = Method(name="static", updates=False, grow_scores=None)
