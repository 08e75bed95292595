"""Merging methods: the contract (``base``), the registry (``registry``) and one file per method.

Importing this package imports no method and no torch; ``registry.method_class`` loads a method
when it is first asked for.
"""
