"""Storage: object stores (store), the key layout and limits (storage_layout), StorageService and
its client side (storage_service, transfer), the sweeper of uncommitted uploads, what a request
may name as a model source (model_source) and `loraflow models import` (models_import)."""
