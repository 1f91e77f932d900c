int cuffd_tests_placeholder(void){return 0;}
