"""A verifiable audit log of a run: RFC 9162 Merkle tree of per-round records, signed tree heads, receipts."""
from .log import AuditError, AuditLog, TreeHead
from .receipts import Receipt, ReceiptBook, check_extends, check_receipt, load_head

__all__ = ["AuditError", "AuditLog", "TreeHead", "Receipt", "ReceiptBook", "check_receipt", "check_extends", "load_head"]
