READ_KEY, ADMIN_KEY = "read-key-123", "admin-key-456"
