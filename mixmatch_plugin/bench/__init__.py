"""The real-data benchmark (`mixmatch bench`)."""
