// The test broker's own admin client, run as a single-file program (java Admin.java):
//   ready BOOTSTRAP             exits 0 once the broker answers a metadata request (describeCluster)
//   topic BOOTSTRAP NAME N [k=v ...]   creates a topic of N partitions with those configs
import java.util.*;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.*;

public class Admin {
    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[1]);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");
        try (AdminClient admin = AdminClient.create(p)) {
            switch (args[0]) {
                case "ready" -> {
                    String id = admin.describeCluster().clusterId().get(5, TimeUnit.SECONDS);
                    int nodes = admin.describeCluster().nodes().get(5, TimeUnit.SECONDS).size();
                    if (nodes < 1) System.exit(1);
                    System.out.println("cluster " + id);
                }
                case "topic" -> {
                    Map<String, String> configs = new HashMap<>();
                    for (int i = 4; i < args.length; i++) {
                        String[] kv = args[i].split("=", 2);
                        configs.put(kv[0], kv[1]);
                    }
                    NewTopic t = new NewTopic(args[2], Integer.parseInt(args[3]), (short) 1).configs(configs);
                    admin.createTopics(List.of(t)).all().get(30, TimeUnit.SECONDS);
                }
                default -> {
                    System.err.println("usage: Admin ready|topic BOOTSTRAP ...");
                    System.exit(2);
                }
            }
        }
    }
}
