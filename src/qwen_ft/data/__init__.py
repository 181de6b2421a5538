"""Data sources (hub / local file / bundled demo), sampling and seeded splits."""
