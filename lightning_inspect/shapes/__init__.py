"""Shape notes, hints and the :class:`ShapeTracer` callback."""
