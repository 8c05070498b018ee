"""Bridges to other libraries, each in its own submodule.

Nothing is imported here, so `import featadapt` never pulls in an optional
dependency: `import featadapt.integrations.peft` is what needs `peft`.
"""
