mod placeholder_until_azure_tests {}
