"""sage's operator library: pure Python, no CLI, no stdin/stdout, no environment variables.

Every operator follows the contract in `operators.base.Operator`, so the same class serves a
`sage` command, a Python program and a Ray actor.
"""
