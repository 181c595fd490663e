"""Integrations with other libraries, each in its own module and each imported only when used.

``fastce.integrations.transformers``: make transformers' causal LMs compute their loss with fastce.
"""
