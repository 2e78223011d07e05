"""Example Pyro models used by the tests, tutorials and benchmarks of ``pyro_emvae``."""
