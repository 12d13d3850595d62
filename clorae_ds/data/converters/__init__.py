"""One small module per source format; each yields Records and raises RecordError naming file:line."""
