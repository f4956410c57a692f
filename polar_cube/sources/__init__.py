"""Getting the sources: download (resumable, checked), archives, format readers, checks of
what arrived, staging into the bucket, and the stand-ins with their local HTTP mirror."""
