"""Routes, one module per concept; each is a thin translation to the library."""
