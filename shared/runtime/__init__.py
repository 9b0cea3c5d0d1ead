"""Runtimes that drive the stages on one machine: the embedded stage workers (``embedded``), with
per-publisher backlogs where paced work waits (architecture §2)."""
