"""The tools people run: the ``leadwriter`` CLI, the demo and the bench. They build their services
through the composition root (``shared.services``) like every other entry point."""
