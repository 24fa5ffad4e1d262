"""One module per data source: I/O shell plus pure row → metric-family functions."""
