"""The migration workbench's plain code: windows, inventories and reconciliation (issue 17)."""
