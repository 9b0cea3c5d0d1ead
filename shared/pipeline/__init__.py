"""The pipeline: the three stages (one module each), what they share, their outcomes, the settle order,
the retry policy and message envelopes. Knows nothing of azure.functions; imports the crm, transport
and secretstore ports, never the runtimes, the API or the tools (architecture §2, §5)."""
