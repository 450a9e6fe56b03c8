"""kacl: knowledge-augmented contrastive learning for chest X-rays (Han et al., WACV 2022)."""

__version__ = "0.1.0"
