"""The formats `export` writes, each one module behind one interface."""
