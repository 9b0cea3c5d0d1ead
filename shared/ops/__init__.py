"""What ops and publishers read and act on: dead letters (list, replay, purge), delivery status, API key
records and telemetry. Built on the transport, secret and state ports (architecture §1, §6)."""
