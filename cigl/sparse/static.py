"""Static sparse training: the initial random mask never changes."""

from cigl.sparse.method import Method

METHOD = Method(name="static", updates=False, needs_grad=False, grow_scores=None)
