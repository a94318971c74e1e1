"""The command-line tools. A package so that they share modules (tools/train_step.py) and tests
import them as ``tools.<name>``, whatever else named ``tools`` the environment holds."""
