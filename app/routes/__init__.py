"""HTTP routes (thin: parse, authorise, call the service, shape the response)."""
