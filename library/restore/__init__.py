"""flux_restore.py's library: image-quality metrics, the restore loop with resume, and the gallery."""
